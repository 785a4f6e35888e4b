"""Steering TCP for the VIP range to the proxy's listener with BPF sk_lookup, not NAT.

The VIP range is a local route (proxy/localroute.py), so a SYN to any VIP and
port is delivered to this host's TCP stack, where it would find no socket. A
BPF ``sk_lookup`` program, attached to the network namespace, runs at that
moment (kernel 5.9+) and hands the proxy's listening socket to the lookup: the
connection is accepted by the proxy with the VIP and port the client asked for
as its local address (``getsockname``). Compared with iptables ``REDIRECT``,
nothing rewrites the packets: no NAT on each packet of the client's connection
and no SO_ORIGINAL_DST lookup in conntrack, which is what made a proxied
connection cost more than one to a proxy listening on the address itself
(bench/results/tcp.md). It also works the same for containers (bridged, where
br_netfilter would defeat ``TPROXY``) and for the host's own processes.

What the program does, in order: TCP over IPv4 only, local address inside the
VIP network only, then the socket in slot 0 of a SOCKMAP (the listener) is
assigned; everything else is left to the normal lookup (``SK_PASS``). It is
assembled here (``program``, pure, tested byte for byte) rather than compiled,
so the agent needs no compiler or BPF toolchain; loading and attaching are
three bpf(2) calls made through ctypes (``attach``). The attachment is a BPF
link owned by the agent's descriptor: it ends with the process, so a stopped or
killed agent leaves nothing behind (the local route then refuses VIP
connections, as with REDIRECT when no proxy listens).

The proxy's own connections to an endpoint inside the VIP range would be
steered back to it; with REDIRECT they carried a mark that exempted them and
were refused by the local route. Here they are refused before connecting
(the same outcome, ``ECONNREFUSED``), by both relays.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import socket
import struct
import sys
from dataclasses import dataclass

# How connections to VIPs reach the proxy (``--tcp-intercept``): auto tries
# sk-lookup and falls back to iptables REDIRECT where the kernel or privileges refuse.
AUTO, SK_LOOKUP, REDIRECT = "auto", "sk-lookup", "redirect"
INTERCEPTS = (AUTO, SK_LOOKUP, REDIRECT)

# linux/bpf.h
_SYS_BPF = {"x86_64": 321, "aarch64": 280}
_BPF_MAP_CREATE, _BPF_MAP_UPDATE_ELEM, _BPF_PROG_LOAD, _BPF_LINK_CREATE = 0, 2, 5, 28
_BPF_MAP_TYPE_SOCKMAP = 15
_BPF_PROG_TYPE_SK_LOOKUP = 30
_BPF_SK_LOOKUP = 36  # attach type
_BPF_PSEUDO_MAP_FD = 1
_HELPER_MAP_LOOKUP_ELEM, _HELPER_SK_RELEASE, _HELPER_SK_ASSIGN = 1, 86, 124
_SK_PASS = 1
# struct bpf_sk_lookup field offsets
_CTX_FAMILY, _CTX_PROTOCOL, _CTX_LOCAL_IP4 = 8, 12, 40
_ATTR_SIZE = 128  # bytes of union bpf_attr passed (the kernel checks the tail is zero)
_LOG_SIZE = 65536


class SkLookupError(OSError):
    """The kernel refused to load or attach the program; the message says what to do."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()  # the message alone, no "[Errno N]"


_PASS = "pass"  # the jump target every early exit takes: return SK_PASS


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One ``struct bpf_insn``: opcode, registers (dst low nibble), offset, immediate."""
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


def _s32(value: int) -> int:
    """A 32-bit pattern as the signed immediate an instruction carries."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _host_u32(address: ipaddress.IPv4Address) -> int:
    """A network-order address as a 32-bit load from memory reads it on this host."""
    return int.from_bytes(address.packed, sys.byteorder)


# Opcodes used (class | op | source), linux/bpf_common.h and linux/bpf.h.
_MOV64_REG, _MOV64_IMM, _ADD64_IMM = 0xBF, 0xB7, 0x07
_LDX_W, _ST_W, _AND32_IMM, _LD_IMM64 = 0x61, 0x62, 0x54, 0x18
_JNE32_IMM, _JEQ_IMM, _CALL, _EXIT = 0x56, 0x15, 0x85, 0x95
_R0, _R1, _R2, _R3, _R6, _R7, _R10 = 0, 1, 2, 3, 6, 7, 10

_Insn = tuple[int, int, int, "int | str", int]  # code, dst, src, offset or label, imm


def program(network: ipaddress.IPv4Network, map_fd: int) -> bytes:
    """The sk_lookup program: assign the SOCKMAP's socket 0 to TCP/IPv4 for ``network``.

    r6 keeps the context; r7 the socket, which must be released whatever the
    assignment gave (the verifier refuses a program that could leak it).
    """
    mask, net = _host_u32(network.netmask), _host_u32(network.network_address)
    body: list[_Insn] = [
        (_MOV64_REG, _R6, _R1, 0, 0),
        (_LDX_W, _R2, _R6, _CTX_PROTOCOL, 0),
        (_JNE32_IMM, _R2, 0, _PASS, socket.IPPROTO_TCP),
        (_LDX_W, _R2, _R6, _CTX_FAMILY, 0),
        (_JNE32_IMM, _R2, 0, _PASS, socket.AF_INET),
        (_LDX_W, _R2, _R6, _CTX_LOCAL_IP4, 0),
        (_AND32_IMM, _R2, 0, 0, _s32(mask)),
        (_JNE32_IMM, _R2, 0, _PASS, _s32(net)),
        (_ST_W, _R10, 0, -4, 0),  # the map key, 0, on the stack
        (_MOV64_REG, _R2, _R10, 0, 0),
        (_ADD64_IMM, _R2, 0, 0, -4),
        (_LD_IMM64, _R1, _BPF_PSEUDO_MAP_FD, 0, map_fd),
        (0, 0, 0, 0, 0),  # the 64-bit immediate's upper half
        (_CALL, 0, 0, 0, _HELPER_MAP_LOOKUP_ELEM),
        (_JEQ_IMM, _R0, 0, _PASS, 0),  # no listener in the map (yet, or any more)
        (_MOV64_REG, _R7, _R0, 0, 0),
        (_MOV64_REG, _R1, _R6, 0, 0),
        (_MOV64_REG, _R2, _R7, 0, 0),
        (_MOV64_IMM, _R3, 0, 0, 0),
        (_CALL, 0, 0, 0, _HELPER_SK_ASSIGN),  # its error leaves the normal lookup
        (_MOV64_REG, _R1, _R7, 0, 0),
        (_CALL, 0, 0, 0, _HELPER_SK_RELEASE),
    ]
    pass_at = len(body)
    body += [(_MOV64_IMM, _R0, 0, 0, _SK_PASS), (_EXIT, 0, 0, 0, 0)]
    return b"".join(
        _insn(code, dst, src, pass_at - (i + 1) if off == _PASS else int(off), imm)
        for i, (code, dst, src, off, imm) in enumerate(body))


class _Bpf:
    """bpf(2) through ctypes: a one-off set-up call, not a hot path, so no C module."""

    def __init__(self) -> None:
        number = _SYS_BPF.get(os.uname().machine)
        if number is None:
            raise SkLookupError(errno.ENOSYS, f"bpf(2) syscall number unknown on "
                                f"{os.uname().machine}: use --tcp-intercept redirect")
        self._number = number
        self._libc = ctypes.CDLL(None, use_errno=True)

    def call(self, command: int, attr: ctypes.Array[ctypes.c_char]) -> int:
        result = int(self._libc.syscall(self._number, command, attr, _ATTR_SIZE))
        if result < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return result


def _attr() -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(_ATTR_SIZE)


@dataclass
class SkLookup:
    """The loaded program, its socket map and the link that attaches it to the netns.

    ``close`` detaches it (so does the process's exit).
    """

    map_fd: int
    prog_fd: int
    link_fd: int

    def close(self) -> None:
        for fd in (self.link_fd, self.prog_fd, self.map_fd):
            if fd >= 0:
                os.close(fd)
        self.link_fd = self.prog_fd = self.map_fd = -1


def attach(listener: socket.socket, network: ipaddress.IPv4Network) -> SkLookup:
    """Steer TCP to ``network`` (any port) to ``listener``, in this network namespace.

    Raises SkLookupError saying what was refused (kernel too old, no CAP_BPF and
    CAP_NET_ADMIN, the verifier's log) and what to do instead.
    """
    bpf = _Bpf()
    fds: list[int] = []
    try:
        attr = _attr()
        struct.pack_into("<IIII", attr, 0, _BPF_MAP_TYPE_SOCKMAP, 4, 8, 1)
        fds.append(_step(bpf, _BPF_MAP_CREATE, attr, "create its socket map"))
        map_fd = fds[0]
        key, value = ctypes.c_uint32(0), ctypes.c_uint64(listener.fileno())
        attr = _attr()
        struct.pack_into("<IIQQQ", attr, 0, map_fd, 0, ctypes.addressof(key),
                         ctypes.addressof(value), 0)
        _step(bpf, _BPF_MAP_UPDATE_ELEM, attr, "put the proxy's listener in its map")
        fds.append(_load(bpf, program(network, map_fd)))
        netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            attr = _attr()
            struct.pack_into("<IIII", attr, 0, fds[1], netns, _BPF_SK_LOOKUP, 0)
            fds.append(_step(bpf, _BPF_LINK_CREATE, attr, "attach it to the network namespace"))
        finally:
            os.close(netns)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return SkLookup(*fds)


def _step(bpf: _Bpf, command: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    try:
        return bpf.call(command, attr)
    except OSError as exc:
        raise _refused(exc, what) from None


def _load(bpf: _Bpf, code: bytes) -> int:
    """Load the program; when the verifier refuses it, load again to get its log."""
    insns = ctypes.create_string_buffer(code, len(code))
    license_text = ctypes.create_string_buffer(b"GPL")
    log_buffer = ctypes.create_string_buffer(_LOG_SIZE)
    attr = _attr()
    struct.pack_into("<IIQQ", attr, 0, _BPF_PROG_TYPE_SK_LOOKUP, len(code) // 8,
                     ctypes.addressof(insns), ctypes.addressof(license_text))
    struct.pack_into("<16s", attr, 48, b"consulate_vips")
    struct.pack_into("<I", attr, 68, _BPF_SK_LOOKUP)
    try:
        return bpf.call(_BPF_PROG_LOAD, attr)
    except OSError as exc:
        if exc.errno != errno.EACCES and exc.errno != errno.EINVAL:
            raise _refused(exc, "load its program") from None
        struct.pack_into("<IIQ", attr, 24, 1, _LOG_SIZE, ctypes.addressof(log_buffer))
        try:
            return bpf.call(_BPF_PROG_LOAD, attr)
        except OSError as again:
            verifier = log_buffer.value.decode(errors="replace").strip().splitlines()
            raise SkLookupError(again.errno, f"the kernel refused the sk_lookup program "
                                f"({again.strerror}): {' | '.join(verifier[-3:])}; use "
                                "--tcp-intercept redirect") from None


def _refused(exc: OSError, what: str) -> SkLookupError:
    hint = {
        errno.EPERM: "the agent needs CAP_BPF and CAP_NET_ADMIN (run it as root)",
        errno.EINVAL: "this kernel has no BPF sk_lookup (Linux 5.9 or later has it)",
        errno.ENOSYS: "this kernel has no bpf(2)",
    }.get(exc.errno or 0, "")
    advice = f"{hint}, or use --tcp-intercept redirect" if hint else \
        "use --tcp-intercept redirect"
    return SkLookupError(exc.errno or 0, f"cannot steer VIP connections with BPF sk_lookup: "
                         f"could not {what} ({exc.strerror}): {advice}")
